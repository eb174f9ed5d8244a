"""The settings: their models, loading from YAML and RELAY_* variables, and the checks that touch the world."""
