"""Ray Serve application: OpenAI-compatible gateway, vLLM multi-LoRA generator, retriever.

Kept import-free: vLLM imports `serving.vllm_lora_fix` in its own processes.
"""
