"""The kopf operator: FineTuneJob in, trainer Job out."""
