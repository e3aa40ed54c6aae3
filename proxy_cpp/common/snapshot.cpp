// MessagePack codec of the routing snapshot, mirroring schemas/messages.py (Snapshot, SnapshotReplica,
// ReplicaLoad): same required fields, same types (a bool is never accepted as an int), extra keys ignored.
#include "common/snapshot.hpp"

#include <msgpack.hpp>

#include <cstring>
#include <exception>

namespace tokenbus {
namespace {

// Limits for the unpacker, far above any real snapshot, so a hostile payload cannot make it allocate
// without bound or recurse deeply.
const msgpack::unpack_limit kUnpackLimit(/*array=*/1 << 16, /*map=*/1 << 16, /*str=*/1 << 20, /*bin=*/0, /*ext=*/0,
                                         /*depth=*/16);

using Map = msgpack::object_map;

// Looks up `key` in a map object; nullptr when absent.
const msgpack::object* field(const Map& map, std::string_view key) {
  for (std::uint32_t i = 0; i < map.size; ++i) {
    const msgpack::object& k = map.ptr[i].key;
    if (k.type == msgpack::type::STR && std::string_view(k.via.str.ptr, k.via.str.size) == key) {
      return &map.ptr[i].val;
    }
  }
  return nullptr;
}

// Each reader returns false and fills `error` when the field is missing or of the wrong type.
bool read_map(const Map& map, std::string_view key, const Map*& out, std::string& error) {
  const msgpack::object* v = field(map, key);
  if (v == nullptr || v->type != msgpack::type::MAP) {
    error = "field '" + std::string(key) + (v == nullptr ? "' is missing" : "' must be a map");
    return false;
  }
  out = &v->via.map;
  return true;
}

bool read_str(const Map& map, std::string_view key, std::string& out, std::string& error) {
  const msgpack::object* v = field(map, key);
  if (v == nullptr || v->type != msgpack::type::STR) {
    error = "field '" + std::string(key) + (v == nullptr ? "' is missing" : "' must be a string");
    return false;
  }
  out.assign(v->via.str.ptr, v->via.str.size);
  return true;
}

bool read_int(const Map& map, std::string_view key, std::int64_t& out, std::string& error) {
  const msgpack::object* v = field(map, key);
  if (v != nullptr && v->type == msgpack::type::POSITIVE_INTEGER && v->via.u64 <= INT64_MAX) {
    out = static_cast<std::int64_t>(v->via.u64);
    return true;
  }
  if (v != nullptr && v->type == msgpack::type::NEGATIVE_INTEGER) {
    out = v->via.i64;
    return true;
  }
  error = "field '" + std::string(key) + (v == nullptr ? "' is missing" : "' must be an int");
  return false;
}

bool read_uint(const Map& map, std::string_view key, std::uint64_t& out, std::string& error) {
  const msgpack::object* v = field(map, key);
  if (v == nullptr || v->type != msgpack::type::POSITIVE_INTEGER) {
    error = "field '" + std::string(key) + (v == nullptr ? "' is missing" : "' must be a non-negative int");
    return false;
  }
  out = v->via.u64;
  return true;
}

bool read_number(const Map& map, std::string_view key, double& out, std::string& error) {
  const msgpack::object* v = field(map, key);
  if (v == nullptr) {
    error = "field '" + std::string(key) + "' is missing";
    return false;
  }
  switch (v->type) {
    case msgpack::type::FLOAT32:
    case msgpack::type::FLOAT64: out = v->via.f64; return true;
    case msgpack::type::POSITIVE_INTEGER: out = static_cast<double>(v->via.u64); return true;
    case msgpack::type::NEGATIVE_INTEGER: out = static_cast<double>(v->via.i64); return true;
    default: error = "field '" + std::string(key) + "' must be a number"; return false;
  }
}

bool read_bool(const Map& map, std::string_view key, bool& out, std::string& error) {
  const msgpack::object* v = field(map, key);
  if (v == nullptr || v->type != msgpack::type::BOOLEAN) {
    error = "field '" + std::string(key) + (v == nullptr ? "' is missing" : "' must be a bool");
    return false;
  }
  out = v->via.boolean;
  return true;
}

bool decode_replica(const msgpack::object& obj, SnapshotReplica& r, std::string& error) {
  if (obj.type != msgpack::type::MAP) {
    error = "snapshot replica must be a map";
    return false;
  }
  const Map& m = obj.via.map;
  std::string state;
  const Map* load = nullptr;
  if (!read_str(m, "id", r.id, error) || !read_str(m, "node", r.node, error) || !read_str(m, "addr", r.addr, error) ||
      !read_str(m, "state", state, error) || !read_int(m, "max_concurrency", r.max_concurrency, error) ||
      !read_map(m, "load", load, error) || !read_bool(m, "healthy", r.healthy, error) ||
      !read_int(*load, "running", r.load.running, error) || !read_int(*load, "waiting", r.load.waiting, error) ||
      !read_number(*load, "kv_usage", r.load.kv_usage, error)) {
    error = "replica: " + error;
    return false;
  }
  if (state == "READY") {
    r.state = ReplicaState::kReady;
  } else if (state == "DRAINING") {
    r.state = ReplicaState::kDraining;
  } else {
    error = "replica " + r.id + ": state must be READY or DRAINING, got '" + state + "'";
    return false;
  }
  return true;
}

std::optional<Snapshot> decode_object(const msgpack::object& root, std::string& error) {
  if (root.type != msgpack::type::MAP) {
    error = "payload must be a map";
    return std::nullopt;
  }
  const Map& m = root.via.map;
  std::int64_t wire = 0;
  if (!read_int(m, "v", wire, error)) return std::nullopt;
  if (wire != kWireVersion) {
    error = "wire version " + std::to_string(wire) + " is not 1";
    return std::nullopt;
  }
  Snapshot s;
  const Map* deployments = nullptr;
  if (!read_str(m, "head_id", s.head_id, error) || !read_uint(m, "epoch", s.epoch, error) || !read_uint(m, "version", s.version, error) ||
      !read_map(m, "deployments", deployments, error)) {
    return std::nullopt;
  }
  s.deployments.reserve(deployments->size);
  for (std::uint32_t i = 0; i < deployments->size; ++i) {
    const msgpack::object& name = deployments->ptr[i].key;
    const msgpack::object& body = deployments->ptr[i].val;
    if (name.type != msgpack::type::STR || body.type != msgpack::type::MAP) {
      error = "deployments must map names to maps";
      return std::nullopt;
    }
    Deployment d;
    d.name.assign(name.via.str.ptr, name.via.str.size);
    if (s.find(d.name) != nullptr) {
      error = "deployment '" + d.name + "' appears twice";
      return std::nullopt;
    }
    const Map& dm = body.via.map;
    const msgpack::object* reps = field(dm, "replicas");
    if (!read_int(dm, "max_model_len", d.max_model_len, error) ||
        !read_number(dm, "first_token_timeout_s", d.first_token_timeout_s, error) ||
        !read_number(dm, "idle_timeout_s", d.idle_timeout_s, error)) {
      error = "deployment '" + d.name + "': " + error;
      return std::nullopt;
    }
    if (reps == nullptr || reps->type != msgpack::type::ARRAY) {
      error = "deployment '" + d.name + "': field 'replicas' must be a list";
      return std::nullopt;
    }
    if (d.max_model_len < 0 || d.first_token_timeout_s < 0 || d.idle_timeout_s < 0) {
      error = "deployment '" + d.name + "': limits must not be negative";
      return std::nullopt;
    }
    d.replicas.resize(reps->via.array.size);
    for (std::uint32_t j = 0; j < reps->via.array.size; ++j) {
      if (!decode_replica(reps->via.array.ptr[j], d.replicas[j], error)) {
        error = "deployment '" + d.name + "': " + error;
        return std::nullopt;
      }
    }
    s.deployments.push_back(std::move(d));
  }
  return s;
}

void pack_str(msgpack::packer<msgpack::sbuffer>& pk, std::string_view s) {
  pk.pack_str(static_cast<std::uint32_t>(s.size()));
  pk.pack_str_body(s.data(), static_cast<std::uint32_t>(s.size()));
}

// A float64 as Python's msgpack writes every float. msgpack-cxx's pack_double would write a whole-valued
// double (0.0) as an integer instead, which breaks the byte-identical round trip.
void pack_float64(msgpack::sbuffer& buffer, double value) {
  std::uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(bits));
  char out[9];
  out[0] = static_cast<char>(0xcb);
  for (int i = 0; i < 8; ++i) out[1 + i] = static_cast<char>(bits >> (56 - 8 * i));
  buffer.write(out, sizeof(out));
}

}  // namespace

const Deployment* Snapshot::find(std::string_view name) const {
  for (const Deployment& d : deployments) {
    if (d.name == name) return &d;
  }
  return nullptr;
}

std::optional<Snapshot> decode_snapshot(std::string_view payload, std::string& error) {
  if (payload.size() > kMaxBusPayloadBytes) {
    error = "payload of " + std::to_string(payload.size()) + " bytes exceeds the limit";
    return std::nullopt;
  }
  // msgpack-cxx reports malformed input only by throwing; this runs on the subscriber thread, not on the
  // request path, and the exception is turned into an error string here.
  try {
    std::size_t offset = 0;
    msgpack::object_handle handle =
        msgpack::unpack(payload.data(), payload.size(), offset, nullptr, nullptr, kUnpackLimit);
    if (offset != payload.size()) {
      error = "trailing bytes after the payload";
      return std::nullopt;
    }
    return decode_object(handle.get(), error);
  } catch (const std::exception& e) {
    error = std::string("payload is not valid MessagePack: ") + e.what();
    return std::nullopt;
  }
}

std::string encode_snapshot(const Snapshot& snapshot) {
  msgpack::sbuffer buffer;
  msgpack::packer<msgpack::sbuffer> pk(buffer);
  pk.pack_map(5);
  pack_str(pk, "v");
  pk.pack(kWireVersion);
  pack_str(pk, "head_id");
  pack_str(pk, snapshot.head_id);
  pack_str(pk, "epoch");
  pk.pack(snapshot.epoch);
  pack_str(pk, "version");
  pk.pack(snapshot.version);
  pack_str(pk, "deployments");
  pk.pack_map(static_cast<std::uint32_t>(snapshot.deployments.size()));
  for (const Deployment& d : snapshot.deployments) {
    pack_str(pk, d.name);
    pk.pack_map(4);
    pack_str(pk, "max_model_len");
    pk.pack(d.max_model_len);
    pack_str(pk, "first_token_timeout_s");
    pack_float64(buffer, d.first_token_timeout_s);
    pack_str(pk, "idle_timeout_s");
    pack_float64(buffer, d.idle_timeout_s);
    pack_str(pk, "replicas");
    pk.pack_array(static_cast<std::uint32_t>(d.replicas.size()));
    for (const SnapshotReplica& r : d.replicas) {
      pk.pack_map(7);
      pack_str(pk, "id");
      pack_str(pk, r.id);
      pack_str(pk, "node");
      pack_str(pk, r.node);
      pack_str(pk, "addr");
      pack_str(pk, r.addr);
      pack_str(pk, "state");
      pack_str(pk, r.state == ReplicaState::kReady ? "READY" : "DRAINING");
      pack_str(pk, "max_concurrency");
      pk.pack(r.max_concurrency);
      pack_str(pk, "load");
      pk.pack_map(3);
      pack_str(pk, "running");
      pk.pack(r.load.running);
      pack_str(pk, "waiting");
      pk.pack(r.load.waiting);
      pack_str(pk, "kv_usage");
      pack_float64(buffer, r.load.kv_usage);
      pack_str(pk, "healthy");
      pk.pack(r.healthy);
    }
  }
  return std::string(buffer.data(), buffer.size());
}

std::string encode_snapshot_request(std::uint64_t have_version) {
  msgpack::sbuffer buffer;
  msgpack::packer<msgpack::sbuffer> pk(buffer);
  pk.pack_map(2);
  pack_str(pk, "v");
  pk.pack(kWireVersion);
  pack_str(pk, "have_version");
  pk.pack(have_version);
  return std::string(buffer.data(), buffer.size());
}

}  // namespace tokenbus
