"""Runtime: CLI, config, supervisor, logging and process wiring."""
