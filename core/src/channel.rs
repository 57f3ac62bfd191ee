//! The nixseed control channel (`org.nixseed.channel.0`): frames and messages.
