"""iqa-ray."""
