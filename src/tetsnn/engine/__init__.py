"""The training engine: configs (``config``), a run's data (``data``), training (``train``),
evaluation (``evaluate``), checkpoints (``checkpoint``), ANN-to-SNN transfer (``transfer``),
distributed setup (``distributed``) and the ``tetsnn`` subcommands' ``main`` functions.

The engine imports the library (neurons, layers, models, data readers, analysis, export); the
library never imports the engine.
"""
