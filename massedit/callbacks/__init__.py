"""massedit.callbacks package."""
