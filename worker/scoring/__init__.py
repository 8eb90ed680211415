"""CLIP scores of edits (InstructPix2Pix's data filter and evaluation metrics): formulas, model, keep rule."""
