"""Optional bridges to other SAE libraries (each module needs its library installed)."""
