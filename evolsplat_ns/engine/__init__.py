"""Small fixes to nerfstudio's training engine that the plugin needs."""
