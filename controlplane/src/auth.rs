//! Who is asking: bearer tokens from a token file (kube-apiserver's `--token-auth-file`
//! format, `token,user,uid,"group1,group2"`), with an admin token made on first start.
use std::collections::HashMap;
use std::path::Path;

/// An authenticated user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
}

impl User {
    /// Who a request without credentials is (when anonymous access is on).
    pub fn anonymous() -> User {
        User {
            name: "system:anonymous".into(),
            groups: vec!["system:unauthenticated".into()],
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Tokens {
    by_token: HashMap<String, User>,
}

/// Parses a token file; malformed lines are errors naming the line.
pub fn parse_tokens(text: &str) -> Result<Tokens, String> {
    let mut by_token = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields: Vec<String> = Vec::new();
        let mut cur = String::new();
        let mut quoted = false;
        for c in line.chars() {
            match c {
                '"' => quoted = !quoted,
                ',' if !quoted => fields.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            }
        }
        fields.push(cur);
        if fields.len() < 3 || fields[0].is_empty() || fields[1].is_empty() {
            return Err(format!(
                "line {}: expected token,user,uid[,\"groups\"]",
                i + 1
            ));
        }
        let groups = fields
            .get(3)
            .map(|g| {
                g.split(',')
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        by_token.insert(
            fields[0].clone(),
            User {
                name: fields[1].clone(),
                groups,
            },
        );
    }
    Ok(Tokens { by_token })
}

impl Tokens {
    pub fn user(&self, token: &str) -> Option<&User> {
        self.by_token.get(token)
    }

    /// Loads `dir/tokens.csv`, creating it with an admin token (group system:masters)
    /// when missing. Returns the tokens and the admin token.
    pub fn load_or_create(dir: &Path) -> anyhow::Result<(Tokens, String)> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join("tokens.csv");
        if !path.exists() {
            let token: String = (0..32)
                .map(|_| format!("{:02x}", rand::random::<u8>()))
                .collect();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            writeln!(f, "{token},admin,admin,\"system:masters\"")?;
        }
        let mut text = std::fs::read_to_string(&path)?;
        // capstan-proxy's identity (kube-proxy's: RBAC gives it system:node-proxier).
        if !parse_tokens(&text).is_ok_and(|t| t.by_token.values().any(|u| u.name == PROXY_USER)) {
            use std::io::Write;
            let token: String = (0..32)
                .map(|_| format!("{:02x}", rand::random::<u8>()))
                .collect();
            let mut f = std::fs::OpenOptions::new().append(true).open(&path)?;
            writeln!(f, "{token},{PROXY_USER},{PROXY_USER}")?;
            text = std::fs::read_to_string(&path)?;
        }
        let tokens = parse_tokens(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let admin = tokens
            .by_token
            .iter()
            .find(|(_, u)| u.groups.iter().any(|g| g == "system:masters"))
            .map(|(t, _)| t.clone())
            .ok_or_else(|| {
                anyhow::anyhow!("{}: no token in group system:masters", path.display())
            })?;
        Ok((tokens, admin))
    }
}

/// The user capstan-proxy authenticates as.
pub const PROXY_USER: &str = "system:kube-proxy";

impl Tokens {
    /// A token of the named user, if the file has one.
    pub fn token_of(&self, user: &str) -> Option<&str> {
        self.by_token
            .iter()
            .find(|(_, u)| u.name == user)
            .map(|(t, _)| t.as_str())
    }
}

/// The kubeconfig that gives its holder `token`'s access to `server`.
pub fn kubeconfig(server: &str, ca_pem: &str, user: &str, token: &str) -> String {
    use base64::Engine;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: capstan\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: {user}\n  user:\n    token: {token}\ncontexts:\n- name: capstan\n  context:\n    cluster: capstan\n    user: {user}\ncurrent-context: capstan\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_files_parse_like_kube_apiservers() {
        let t = parse_tokens("# comment\nabc,alice,1,\"dev,ops\"\nxyz,bob,2\n").unwrap();
        assert_eq!(t.user("abc").unwrap().groups, vec!["dev", "ops"]);
        assert_eq!(t.user("xyz").unwrap().name, "bob");
        assert!(t.user("nope").is_none());
        assert!(
            parse_tokens("only-a-token\n")
                .unwrap_err()
                .contains("line 1")
        );
    }
}
