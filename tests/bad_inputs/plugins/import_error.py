"""A local plugin whose import fails."""
import surgery_no_such_dependency  # noqa: F401
