"""Where a classifier looks: Grad-CAM and LIME overlays for single images (`explainer.explain`)."""
