"""Engines: model code behind the Thinker/Talker interfaces."""
