"""Invitations to join a calendar: expiry and cleanup."""
