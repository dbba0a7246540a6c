"""Datasets: the synthetic generator, COCO / semantic-PNG validation and preparation, loading."""


class DataError(Exception):
    """A problem of the data a user gave (a corrupt prepared index, an invalid dataset), not of
    the command or its config: ``knet`` exits 1 for it (2 for usage and config errors)."""
