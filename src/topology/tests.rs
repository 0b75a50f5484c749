use super::*;

#[test]
fn probe() {
    let cases = [
        "[[host]]\nname = \"h\"\naddress = \"1.2.3.4\"\n\n[[instance]]\nname = \"i\"\nhost = \"h\"\nip = \"10.0.0.5\"\n",
        "[[host]]\nname = \"h\"\naddress = \"1.2.3.4\"\nbogus = 1\n",
        "[[host]]\nname = \"h\"\naddress = \n",
        "[[host]]\nname = \"h\"\naddress = \"1.2.3.4\"\n[[instance]]\nname = \"i\"\nhost = \"h\"\nsubnet = \"s\"\n",
        "[[instance]]\nname = \"i\"\nhost = \"h\"\nsubnet = \"s\"\nip = 5\n",
        "[[instance]]\nname = \"i\"\nhost = \"h\"\nsubnet = \"s\"\n security_groups = \"x\"\n",
        "[[acl]]\nname = \"i\"\nvpc = \"v\"\ningress = [\n  { action = \"accept\", protocol = \"tcp\", port = 1.5, cidr = \"1.0.0.0/8\" },\n]\n",
        "[underlay]\nmtu = 1500\n[underlay]\nmtu = 1400\n",
        "[[peering]]\nname = \"p\"\nvpcs = [\"a\"]\n",
    ];
    for c in cases {
        match Topology::parse(c, "t.toml") {
            Ok(_) => println!("OK"),
            Err(e) => println!("---\n{e}"),
        }
    }
    panic!();
}
