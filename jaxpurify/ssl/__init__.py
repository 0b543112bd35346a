"""Self-supervised pre-training methods: one pure jitted step each."""
