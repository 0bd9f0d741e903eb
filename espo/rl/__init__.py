"""The RL loop: ``espo.train`` (``trainer``) with its settings (``config``), the policy/value update (``update``,
``losses``, ``advantages``), the CERO allocator (``allocator``), value pretraining (``value_fit``) and the run
folder with its checkpoints (``run_folder``, ``checkpoint``)."""
