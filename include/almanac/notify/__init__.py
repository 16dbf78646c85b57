"""Notifications: the outbox every job and the product's backend send messages to people through."""
