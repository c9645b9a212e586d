"""Denoising strategies: candidate tokens and scores, transfer schedules, and commit selection."""
