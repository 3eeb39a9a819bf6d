"""Human-readable reports: the run report, the studies report, the leaderboard, and the one table renderer."""
