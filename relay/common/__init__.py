"""Small parts several packages share; none imports another package of the relay."""
