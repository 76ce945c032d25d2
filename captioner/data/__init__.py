"""Data sets, vocabulary, image loading and the Lightning DataModule."""
