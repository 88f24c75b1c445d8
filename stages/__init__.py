"""DVC stage entry points: one thin module per stage (`python -m stages.<name>`)."""
