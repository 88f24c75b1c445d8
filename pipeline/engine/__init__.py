"""Engines: training loop, inference, metrics, pseudo-labels, toy CLIP pretraining."""
