"""The control-plane bus: snapshot publish/subscribe (zguide clone pattern), peer liveness, the admin client."""
