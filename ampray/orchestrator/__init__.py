"""The driver side: job configs, launching runs, TensorBoard, the CLI."""
