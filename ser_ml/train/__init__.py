"""Offline recipes: training, evaluation, plots and the generated non-speech training material.
Run by ``ser train|evaluate|build-encoder|train-speech-detector``, never by a serving process."""
