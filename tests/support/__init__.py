"""Local stand-ins for internet services, speaking their real wire protocols."""
