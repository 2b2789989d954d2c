"""LoRA fine-tuning with Ray Train + DeepSpeed + PEFT, and the adapter registry."""
