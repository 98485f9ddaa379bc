"""One small Python file per experiment, each with `get_config(arg)` returning a ConfigDict
(`--config=configs/<file>.py:arg`); `common.py` holds what they share."""
