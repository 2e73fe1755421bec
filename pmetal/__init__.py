"""pmetal: fine-tune language and embedding models on Apple Silicon, CUDA and CPU.

The core package. Training methods live in `pmetal.modules` (one LightningModule each) and
Lightning callbacks in `pmetal.callbacks`; both depend on this core, never the reverse.
Importing `pmetal` is cheap: heavy libraries are imported where they are used.
"""

__version__ = "0.1.0"
