"""The guest agent's wire protocol (``protocol``): a pure codec, shared by the VMM side that
talks to a running guest and the image builder that ships the agent."""
