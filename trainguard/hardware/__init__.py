"""Hardware: probing the device and the bundled profiles."""
