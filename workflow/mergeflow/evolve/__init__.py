"""The evolution loop: Nevergrad search, in-memory fitness, and the ask / evaluate / tell stages."""
