"""Built-in architecture plugins; each registers through the same hooks as a third-party package."""
