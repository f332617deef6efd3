"""Projects: project-scoped secrets and the services that use them."""
