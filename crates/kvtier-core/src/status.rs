//! The composable status tree.
//!
//! Every component implements [`StatusReport`] and returns a [`StatusNode`]: its own fields plus
//! `is_healthy`. Parents nest their children with [`StatusNode::child`] (or lists/maps of them);
//! a parent is unhealthy as soon as any child is, and says which child in `unhealthy_reason`.
//! A node that is unhealthy for its own reason says why in the same field.
//!
//! Serialised form (JSON, field order preserved): `is_healthy` first, then `unhealthy_reason`
//! (only when unhealthy), then the fields in insertion order. Field names follow LMCache where
//! LMCache has the field, so LMCache's status tooling can read a kvtier tree.
//!
//! Client nodes ([`StatusNode::client_map`]) describe engine instances: they carry their own
//! health and reason but do not make their parent unhealthy.
//!
//! Liveness vs readiness: a node is *unhealthy* when it cannot serve well (readiness: an
//! orchestrator should stop sending it traffic); it is also *not live* when the process no longer
//! works and only a restart helps (a dead poll, eviction or housekeeping thread). Components mark
//! the latter with [`StatusNode::require_live`]; [`StatusNode::is_live`] is false when any node
//! of the tree says so. A not-live node is always unhealthy too.
//!
//! Reports must be cheap: they are built from counters and snapshots, never by iterating cache
//! objects under a lock.

use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};
use serde_json::Value;

/// A component that can describe its own state.
pub trait StatusReport {
    /// Builds this component's node. Must not block on hot-path locks or iterate objects.
    fn report_status(&self) -> StatusNode;
}

#[derive(Debug, Clone)]
enum Field {
    Value(Value),
    Node(StatusNode),
    List(Vec<StatusNode>),
    Map(Vec<(String, StatusNode)>),
}

/// One node of the status tree.
#[derive(Debug, Clone, Default)]
pub struct StatusNode {
    own_reason: Option<String>,
    /// The own reason means the process does not work (see the module docs).
    fatal: bool,
    unhealthy_children: Vec<String>,
    fields: Vec<(String, Field)>,
}

impl StatusNode {
    /// A healthy node with no fields.
    pub fn healthy() -> Self {
        Self::default()
    }

    /// A node that is unhealthy for its own `reason`.
    pub fn unhealthy(reason: impl Into<String>) -> Self {
        Self {
            own_reason: Some(reason.into()),
            ..Self::default()
        }
    }

    /// Marks the node unhealthy for `reason` when `condition` is false.
    pub fn require(mut self, condition: bool, reason: impl Into<String>) -> Self {
        if !condition {
            let reason = reason.into();
            self.own_reason = Some(match self.own_reason.take() {
                Some(prev) => format!("{prev}; {reason}"),
                None => reason,
            });
        }
        self
    }

    /// Like [`require`](Self::require), and a failed `condition` also makes the tree not live.
    pub fn require_live(self, condition: bool, reason: impl Into<String>) -> Self {
        let mut node = self.require(condition, reason);
        node.fatal |= !condition;
        node
    }

    /// Whether no node of the tree says the process does not work.
    pub fn is_live(&self) -> bool {
        self.not_live_paths("").is_empty()
    }

    /// The nodes that make the tree not live, as `(dotted.path, reason)`.
    pub fn not_live_paths(&self, root: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        self.collect(root, &mut out, true);
        out
    }

    /// Adds a scalar (or any serialisable) field. Values that fail to serialise become `null`.
    pub fn field(mut self, key: impl Into<String>, value: impl Serialize) -> Self {
        let value = serde_json::to_value(value).unwrap_or(Value::Null);
        self.fields.push((key.into(), Field::Value(value)));
        self
    }

    /// Adds several fields (e.g. a metric set's `status_fields`), in order.
    pub fn fields(mut self, fields: serde_json::Map<String, Value>) -> Self {
        self.fields
            .extend(fields.into_iter().map(|(k, v)| (k, Field::Value(v))));
        self
    }

    /// Nests a child node; the parent becomes unhealthy if the child is.
    pub fn child(mut self, key: impl Into<String>, child: StatusNode) -> Self {
        let key = key.into();
        if !child.is_healthy() {
            self.unhealthy_children.push(key.clone());
        }
        self.fields.push((key, Field::Node(child)));
        self
    }

    /// Nests a list of child nodes (rendered by viewers as `key[i]`).
    pub fn child_list(mut self, key: impl Into<String>, children: Vec<StatusNode>) -> Self {
        let key = key.into();
        for (i, c) in children.iter().enumerate() {
            if !c.is_healthy() {
                self.unhealthy_children.push(format!("{key}[{i}]"));
            }
        }
        self.fields.push((key, Field::List(children)));
        self
    }

    /// Nests a map of named child nodes.
    pub fn child_map(
        mut self,
        key: impl Into<String>,
        children: Vec<(String, StatusNode)>,
    ) -> Self {
        let key = key.into();
        for (name, c) in &children {
            if !c.is_healthy() {
                self.unhealthy_children.push(format!("{key}.{name}"));
            }
        }
        self.fields.push((key, Field::Map(children)));
        self
    }

    /// Nests a map of named child nodes that describe *clients* (engine instances): each shows
    /// its own health and reason, but an unhealthy one does not make this node (or the server's
    /// readiness) unhealthy, because one client's broken state must not take the server out of
    /// service for every other client. [`unhealthy_paths`](Self::unhealthy_paths) still lists
    /// them.
    pub fn client_map(
        mut self,
        key: impl Into<String>,
        children: Vec<(String, StatusNode)>,
    ) -> Self {
        self.fields.push((key.into(), Field::Map(children)));
        self
    }

    /// Whether this node and all its descendants are healthy.
    pub fn is_healthy(&self) -> bool {
        self.own_reason.is_none() && self.unhealthy_children.is_empty()
    }

    /// Why this node is unhealthy, if it is.
    pub fn unhealthy_reason(&self) -> Option<String> {
        let children = (!self.unhealthy_children.is_empty())
            .then(|| format!("unhealthy: {}", self.unhealthy_children.join(", ")));
        match (&self.own_reason, children) {
            (None, None) => None,
            (Some(r), None) => Some(r.clone()),
            (None, Some(c)) => Some(c),
            (Some(r), Some(c)) => Some(format!("{r}; {c}")),
        }
    }

    /// The nodes that are unhealthy for their own reason, as `(dotted.path, reason)`, depth first.
    /// `root` names the node itself in the paths.
    pub fn unhealthy_paths(&self, root: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        self.collect(root, &mut out, false);
        out
    }

    /// Collects own reasons depth first (`fatal_only`: only the not-live ones).
    fn collect(&self, path: &str, out: &mut Vec<(String, String)>, fatal_only: bool) {
        if let Some(r) = &self.own_reason
            && (self.fatal || !fatal_only)
        {
            out.push((path.to_owned(), r.clone()));
        }
        for (key, f) in &self.fields {
            match f {
                Field::Value(_) => {}
                Field::Node(n) => n.collect(&join(path, key), out, fatal_only),
                Field::List(l) => {
                    for (i, n) in l.iter().enumerate() {
                        n.collect(&format!("{}[{i}]", join(path, key)), out, fatal_only);
                    }
                }
                Field::Map(m) => {
                    for (name, n) in m {
                        n.collect(&join(&join(path, key), name), out, fatal_only);
                    }
                }
            }
        }
    }

    /// Converts the tree to a JSON value.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

impl Serialize for StatusNode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let reason = self.unhealthy_reason();
        let mut map = serializer.serialize_map(Some(self.fields.len() + 2))?;
        map.serialize_entry("is_healthy", &reason.is_none())?;
        if let Some(r) = &reason {
            map.serialize_entry("unhealthy_reason", r)?;
        }
        for (k, f) in &self.fields {
            match f {
                Field::Value(v) => map.serialize_entry(k, v)?,
                Field::Node(n) => map.serialize_entry(k, n)?,
                Field::List(l) => map.serialize_entry(k, l)?,
                Field::Map(m) => map.serialize_entry(k, &OrderedNodes(m))?,
            }
        }
        map.end()
    }
}

struct OrderedNodes<'a>(&'a [(String, StatusNode)]);

impl Serialize for OrderedNodes<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (k, n) in self.0 {
            map.serialize_entry(k, n)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_is_only_lost_to_require_live() {
        let busy = StatusNode::healthy().require(false, "oldest store in flight 41.2 s");
        let root = StatusNode::healthy().child("l2", busy);
        assert!(!root.is_healthy() && root.is_live());
        let dead = StatusNode::healthy().require_live(false, "housekeeping thread is not running");
        let root = root.child_list("threads", vec![dead]);
        assert!(!root.is_live());
        assert_eq!(
            root.not_live_paths("engine"),
            vec![(
                "engine.threads[0]".to_owned(),
                "housekeeping thread is not running".to_owned()
            )]
        );
        assert_eq!(root.unhealthy_paths("engine").len(), 2);
    }

    #[test]
    fn health_propagates_and_reasons_name_the_path() {
        let evict = StatusNode::healthy()
            .field("thread_alive", false)
            .require(false, "eviction thread is not running");
        let l1 = StatusNode::healthy().field("total_object_count", 3);
        let sm = StatusNode::healthy()
            .child("l1_manager", l1)
            .child("l1_eviction_controller", evict)
            .child_list("l2_adapters", vec![StatusNode::healthy()]);
        let root = StatusNode::healthy()
            .field("chunk_size", 256)
            .child("storage_manager", sm);
        assert!(!root.is_healthy());
        let v = root.to_value();
        assert_eq!(v["is_healthy"], false);
        assert_eq!(v["unhealthy_reason"], "unhealthy: storage_manager");
        assert_eq!(v["storage_manager"]["l1_manager"]["is_healthy"], true);
        assert_eq!(
            v["storage_manager"]["l1_eviction_controller"]["unhealthy_reason"],
            "eviction thread is not running"
        );
        assert_eq!(
            root.unhealthy_paths("engine"),
            vec![(
                "engine.storage_manager.l1_eviction_controller".to_owned(),
                "eviction thread is not running".to_owned()
            )]
        );
        // is_healthy is serialised first.
        let text = serde_json::to_string(&root).expect("serialises");
        assert!(text.starts_with("{\"is_healthy\":false,\"unhealthy_reason\""));
    }

    #[test]
    fn healthy_tree_has_no_reason_field() {
        let root = StatusNode::healthy().child_map(
            "l1_managers",
            vec![("_default".to_owned(), StatusNode::healthy().field("x", 1))],
        );
        let v = root.to_value();
        assert_eq!(v["is_healthy"], true);
        assert!(v.get("unhealthy_reason").is_none());
        assert_eq!(v["l1_managers"]["_default"]["x"], 1);
        assert!(root.unhealthy_paths("").is_empty());
    }
}
