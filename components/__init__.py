"""One module per DVC stage: `python -m components.<stage>`."""
