"""Names every stage shares: init modes, solvers, dtypes, default targets, file names.

Plain Python only (no torch): the command line reads these at start-up.
"""

SELECTIONS = ("milora", "pissa", "middle", "random")
"""Which singular triplets an SVD-based init takes (see `milora.linalg.decomposition`)."""
PEFT_STARTS = ("dora", "olora", "pissa-fast", "corda-kpm", "corda-ipm", "eva", "lora-ga", "mica", "loftq")
"""Starts computed by PEFT's own code (see `milora.init.peft_starts`; loftq needs a quantised base)."""
INIT_MODES = (*SELECTIONS, "lora", *PEFT_STARTS)
"""Adapter initialisations: the SVD-based selections, PEFT's default LoRA start and PEFT's other starts."""
RESIDUAL_INITS = (*SELECTIONS, "olora", "pissa-fast", "corda-kpm", "corda-ipm", "lora-ga", "loftq")
"""Inits that move a start into the adapter, W_res = W - s B0 A0: their saved update has rank 2r."""
DATA_INITS = ("corda-kpm", "corda-ipm", "eva", "lora-ga")
"""Starts computed from batches of the training data (calibration batches)."""
SOLVERS = ("auto", "eigh", "lanczos", "svd")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("nf4", "fp4", "int8")
"""bitsandbytes quantisations of the frozen base after the init (see `milora.init.quantize`)."""
PAPER_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
"""The modules the paper adapts (its math setting; also milora's default)."""
TARGET_SCOPES = ("language_model", "whole_model")
"""Where target module names apply in an image-text-to-text model (see `milora.init.multimodal`)."""
EMBEDDED_MODEL = "SmolLM2-135M-Instruct"

# a saved adapter directory (see milora.adapter.format)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MILORA_CONFIG = "milora_config.json"
ADAPTER_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, MILORA_CONFIG)
"""In the order they are moved into place: a directory with milora_config.json has them all."""

# a training run's directory (see milora.training.run)
TRAIN_CONFIG_FILE = "train_config.yaml"
METRICS_FILE = "metrics.json"
