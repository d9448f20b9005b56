"""Doors into other libraries' extension points: torch's flash-attention
provider registry (torch_sdpa) and Hugging Face transformers'
attention interface (huggingface). Each is opt-in: importing tessel
registers and activates nothing, and transformers stays optional."""
