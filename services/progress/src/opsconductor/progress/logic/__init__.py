"""Service logic of the progress service: who may read which events, and their fan-out."""
