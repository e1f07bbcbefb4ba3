"""Actors: the session host, session actors and the stage workers."""
