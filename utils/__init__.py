"""The trainer's rooms besides data/ and optimizer/ (doc/ARCHITECTURE.md): options, model, objective, run, watch,
plugins."""
