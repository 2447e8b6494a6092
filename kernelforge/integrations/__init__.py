"""KernelForge ops inside engines people already run (docs/integrations.md)."""
