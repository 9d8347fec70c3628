"""The Cog service's own code (``predict.py`` is the predictor): where its weights come from."""
