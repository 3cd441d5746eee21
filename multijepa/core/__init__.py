"""The modality-agnostic JEPA core: transformer, masking, model, loss (see jepa.build_model)."""
