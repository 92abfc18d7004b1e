"""Defaults declared once, for the library and the command line alike (mlx-lm's DEFAULT_* pattern). A leaf
module: it imports nothing, so the CLI can read these without loading numpy or llama.cpp."""

DEFAULT_MAX_TOKENS = 512  # the longest answer per question, in ask, chat and batch alike
DEFAULT_CHAT_CTX = 8192  # a conversation's whole context; old turns are dropped (visibly) beyond it
DEFAULT_BATCH_CTX = 8192  # per unit; long series are sampled to fit
MAX_SLICES = 85  # 85 × 256 image tokens stay under a 32K context (MedGemma 1.5 recipe)
DEFAULT_KV_TYPE = "f16"  # llama.cpp's own; q8_0 about halves the KV cache (flash attention; logits move ≤ 0.1)
MAX_PATCHES = 125  # whole-slide patches of 896² (the WSI notebook's cap; 126 in training): ~33K image tokens
DEFAULT_MAGNIFICATION = "10x"  # the WSI notebook's level; 5x and 20x were trained on too
MAX_PAGES = 20  # PDF pages rendered as images per document (~5K image tokens); the text layer is read whole
DEFAULT_CACHE_GB = 8.0  # image embeddings and prompt states kept in the store for later questions (LRU)
