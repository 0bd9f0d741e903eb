"""The run-level pieces: the ``espo`` command line (``cli``), the demo (``demo``) and model conversion from
registry packages (``model_fetch``)."""
