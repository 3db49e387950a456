"""massedit.editing package."""
