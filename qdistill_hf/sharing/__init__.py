"""Using and sharing a trained model: the model card and the worklist CLI (`qdistill-triage`)."""

from .model_card import (
    CARD_METRICS,
    build_model_card,
    load_evaluation,
    push_folder_to_hub,
    save_for_hub,
    write_model_card,
)


__all__ = ["CARD_METRICS", "build_model_card", "load_evaluation", "push_folder_to_hub", "save_for_hub", "write_model_card"]
