//! Chat prompts: the model's own Jinja `chat_template` (from `tokenizer_config.json` or
//! `chat_template.jinja`), rendered with minijinja and Python string methods, or a built-in
//! template for Llama-2 chat, Zephyr/TinyLlama chat and Llama-3 instruct models.

use std::path::Path;

use minijinja::{Environment, ErrorKind, context};
use serde::Serialize;

use crate::error::{LlamaError, Result, read_file, read_json};

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text of the turn.
    pub content: String,
}

impl Message {
    /// A message of `role` saying `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The built-in templates, for models whose files carry none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuiltinTemplate {
    /// Llama-2 chat: `<s>[INST] <<SYS>>...<</SYS>> user [/INST] answer </s>`.
    Llama2,
    /// Zephyr, as TinyLlama-1.1B-Chat uses: `<|user|>\ntext</s>\n<|assistant|>\n`.
    Zephyr,
    /// Llama-3 instruct: `<|start_header_id|>role<|end_header_id|>\n\ntext<|eot_id|>`.
    Llama3,
}

impl BuiltinTemplate {
    fn source(self) -> &'static str {
        match self {
            BuiltinTemplate::Llama2 => concat!(
                "{% if messages and messages[0].role == 'system' %}",
                "{% set system = messages[0].content %}{% set turns = messages[1:] %}",
                "{% else %}{% set system = none %}{% set turns = messages %}{% endif %}",
                "{% for m in turns %}",
                "{% if m.role == 'user' %}{{ bos_token }}[INST] ",
                "{% if loop.first and system %}<<SYS>>\n{{ system }}\n<</SYS>>\n\n{% endif %}",
                "{{ m.content | trim }} [/INST]",
                "{% elif m.role == 'assistant' %} {{ m.content | trim }} {{ eos_token }}",
                "{% else %}{{ raise_exception('Llama-2 chat has no role ' ~ m.role) }}{% endif %}",
                "{% endfor %}",
            ),
            BuiltinTemplate::Zephyr => concat!(
                "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{{ eos_token }}\n",
                "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
            ),
            BuiltinTemplate::Llama3 => concat!(
                "{{ bos_token }}{% for m in messages %}",
                "<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content | trim }}<|eot_id|>",
                "{% endfor %}{% if add_generation_prompt %}",
                "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
            ),
        }
    }

    /// Parses `llama2`, `zephyr` or `llama3`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "llama2" => Some(BuiltinTemplate::Llama2),
            "zephyr" | "tinyllama" => Some(BuiltinTemplate::Zephyr),
            "llama3" => Some(BuiltinTemplate::Llama3),
            _ => None,
        }
    }
}

/// A chat template with the special tokens it refers to.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

/// A special token in `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_text(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(o)) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// A template from its Jinja source and special tokens.
    pub fn new(source: impl Into<String>, bos_token: &str, eos_token: &str) -> Self {
        ChatTemplate {
            source: source.into(),
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        }
    }

    /// A built-in template with the given special tokens.
    pub fn builtin(which: BuiltinTemplate, bos_token: &str, eos_token: &str) -> Self {
        Self::new(which.source(), bos_token, eos_token)
    }

    /// The template a Hugging Face model directory carries: `chat_template.jinja`, else the
    /// `chat_template` of `tokenizer_config.json` (a string, or a list of named templates of
    /// which `default` is taken). `Ok(None)` when the model has none.
    pub fn from_model_dir(dir: impl AsRef<Path>) -> Result<Option<Self>> {
        let dir = dir.as_ref();
        let config =
            read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(serde_json::Value::Null);
        let bos = token_text(config.get("bos_token"));
        let eos = token_text(config.get("eos_token"));
        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            let source = String::from_utf8_lossy(&read_file(&jinja)?).into_owned();
            return Ok(Some(Self::new(source, &bos, &eos)));
        }
        let source = match config.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string),
            _ => None,
        };
        Ok(source.map(|s| Self::new(s, &bos, &eos)))
    }

    /// Renders `messages`, ending with the assistant's cue when `add_generation_prompt`.
    /// Errors (a syntax error, or the template's own `raise_exception`) are
    /// [`LlamaError::Invalid`] with minijinja's message.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.render_str(
            &self.source,
            context! {
                messages => minijinja::value::Serde(messages),
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
                add_generation_prompt => add_generation_prompt,
            },
        )
        .map_err(|e| LlamaError::Invalid(format!("chat template: {e:#}")))
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    fn chat() -> Vec<Message> {
        vec![
            Message::new("system", "Be brief."),
            Message::new("user", " Hi! "),
            Message::new("assistant", "Hello."),
            Message::new("user", "Tell me a story."),
        ]
    }

    #[test]
    fn llama3_builtin_renders_headers_and_cue() {
        let t = ChatTemplate::builtin(BuiltinTemplate::Llama3, "<|begin_of_text|>", "<|eot_id|>");
        let out = t.render(&chat()[..2], true).expect("render");
        assert_eq!(
            out,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn zephyr_and_llama2_builtins() {
        let z = ChatTemplate::builtin(BuiltinTemplate::Zephyr, "<s>", "</s>");
        assert_eq!(
            z.render(&chat()[1..2], true).expect("render"),
            "<|user|>\n Hi! </s>\n<|assistant|>\n"
        );
        let l = ChatTemplate::builtin(BuiltinTemplate::Llama2, "<s>", "</s>");
        assert_eq!(
            l.render(&chat(), true).expect("render"),
            "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi! [/INST] Hello. </s>\
             <s>[INST] Tell me a story. [/INST]"
        );
    }

    #[test]
    fn model_templates_get_python_methods_and_raise_exception() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}\
             {% endif %}[{{ m.role.upper() }}]{{ m.content.strip() }}{% endfor %}",
            "",
            "",
        );
        assert_eq!(
            t.render(&chat()[1..3], false).expect("render"),
            "[USER]Hi![ASSISTANT]Hello."
        );
        let err = t
            .render(&[Message::new("tool", "x")], false)
            .expect_err("must fail");
        assert!(err.to_string().contains("no tools"), "{err}");
        let broken = ChatTemplate::new("{% for m in messages %}", "", "");
        assert!(matches!(
            broken.render(&chat(), true),
            Err(LlamaError::Invalid(_))
        ));
    }
}
