"""kdlib: BERT knowledge distillation with every experiment tracked in MLflow."""
